//! Wire formats: the broker envelope (MessagePack) and the client protocol (JSON or MessagePack).
//!
//! This module is the only one that knows MessagePack. Everything that crosses RabbitMQ is an
//! [`Envelope`] encoded with `rmp_serde::to_vec_named`; byte fields travel as MessagePack `bin`
//! through `serde_bytes`. Decoding never panics: bad bytes give a [`WireError`].

pub mod client;
pub mod jpeg;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A frame's verdict travels in results; it is one of the shared words.
pub use crate::domain::Verdict;

/// The schema version this build writes. Older versions that still decode are listed in
/// `tests/golden/`.
///
/// Schema 2 added the `low_quality` verdict, the face's quality measures, what temporal
/// liveness compares across frames (first the face signature, now the face's `appearance`),
/// and the fused temporal liveness. Every field it added is optional, so a schema-1 event
/// decodes unchanged.
pub const SCHEMA: u16 = 2;

/// The oldest schema version this build still decodes.
pub const SCHEMA_MIN: u16 = 1;

/// MIME type set as the AMQP `content_type` of every event.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// Errors from encoding or decoding an event.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed msgpack event: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("cannot encode event: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("unsupported schema version {found} (this build reads {SCHEMA_MIN} to {SCHEMA})")]
    UnsupportedSchema { found: u16 },
}

/// Every event on the broker: who produced it, when, until when it matters, and its payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Schema version of this envelope; see [`SCHEMA`].
    pub schema: u16,
    /// Unique event id (UUIDv7, 16 bytes on the wire); also the AMQP `message_id`.
    pub id: Uuid,
    /// Producer id: an edge id for frames, a worker id for results.
    pub source: String,
    /// Per-source sequence number, increasing by one per event a source produces.
    pub seq: u64,
    /// The client the event is about.
    pub client_id: String,
    /// Wall-clock time the event was produced, in Unix milliseconds.
    pub produced_at_ms: u64,
    /// Wall-clock time after which the event is worthless, in Unix milliseconds.
    pub deadline_ms: u64,
    /// W3C trace context (`00-<trace id>-<span id>-<flags>`). Packed into 26 bytes of `bin`
    /// on the wire when well formed.
    #[serde(with = "packed_traceparent")]
    pub traceparent: String,
    pub payload: Payload,
}

/// The closed set of things that travel on the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    Frame(Frame),
    Result(FrameResult),
    Dropped(Dropped),
    Action(ActionEvent),
    Control(ControlEvent),
    /// An administrator's operation on a client, on its way to the audit trail.
    AdminOp(AdminOpEvent),
    /// Photos to enrol the envelope's client from, for a worker with the model stack.
    EnrollRequest(EnrollRequest),
    /// A worker's answer to an [`EnrollRequest`], routed back to the edge that asked.
    EnrollResult(EnrollResult),
    /// A candidate's session started or ended on an edge, on its way to the audit trail.
    Session(SessionChange),
}

/// A session's start or end (the envelope names the client and the edge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionChange {
    /// The edge's session number.
    pub session: u64,
    /// `started` or `ended`.
    pub event: String,
    /// For an end, why: `closed` (by the client), `connection_lost`, `replaced`, `blocked`,
    /// `signed_out`, `kicked`, `idle`, `shutdown`, ...; empty for a start.
    pub reason: String,
    pub at_ms: u64,
    /// The candidate's address as the edge saw it (behind a trusted proxy, the one the proxy
    /// reported).
    #[serde(default)]
    pub address: String,
}

/// The most photos one enrolment may carry (the edge refuses more, and so does the worker).
pub const MAX_ENROLL_PHOTOS: usize = 5;

/// Photos to enrol a client from (JPEG, checked by the edge like frames), at most
/// [`MAX_ENROLL_PHOTOS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub photos: Vec<serde_bytes::ByteBuf>,
}

/// What a worker made of an enrolment request (`request_id` is the request envelope's id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollResult {
    pub request_id: Uuid,
    pub outcome: EnrollOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum EnrollOutcome {
    /// The quality checks passed: the reference embedding (packed as frames carry it).
    Enrolled {
        embedding: serde_bytes::ByteBuf,
        model: String,
        /// Each photo's similarity to the template.
        similarities: Vec<f32>,
        /// The lowest similarity minus the match threshold.
        margin: f32,
    },
    /// The photos failed the quality checks (no face, several faces, too small, ...).
    Refused { reason: String },
}

/// An administrator's operation on a client (the envelope names the client), audited with the
/// operator who made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminOpEvent {
    /// `add`, `pause`, `resume`, `block`, `unblock`, `kick`, `remove`, or `force:<action>`.
    pub operation: String,
    /// The operator's name (from their admin token, or the CLI's user).
    pub operator: String,
    pub at_ms: u64,
    /// What the operation changed or read, where that matters later: an enrolment's photo
    /// and template SHA-256s, an operator's role, an import's count, the file read.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// An admin change or a cluster coordination message, broadcast to every edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlEvent {
    pub command: ControlCommand,
    /// Who asked: `cli`, `admin-api@<edge>`, or the edge that announces a session.
    pub issued_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlCommand {
    Block,
    Unblock,
    Pause,
    Resume,
    Kick,
    /// Ask the client's live session for a liveness challenge now.
    Challenge,
    /// Enforce an action now, through the same path as the policy's (audit included).
    ForceAction {
        action: crate::domain::Action,
    },
    /// A session started for the client on `edge` at `since_ms`: any older session of it ends
    /// (newer wins; ties go to the larger session number).
    SessionStarted {
        edge: String,
        session: u64,
        since_ms: u64,
    },
}

/// An enforced action on its way to the audit trail, with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionEvent {
    pub action_id: Uuid,
    /// The edge's id for this action's evidence, kept in its record (the writer names the
    /// evidence folder by `action_id`, which it checks).
    pub evidence_id: Uuid,
    pub action: crate::domain::Action,
    /// The verdict that fired it, `ok` for a return to allow, or `admin`.
    pub reason: String,
    /// `policy` or `admin`.
    pub origin: String,
    pub session: u64,
    pub decided_at_ms: u64,
    /// The policy rule that fired, as configured (`k of n`, step, cooldown).
    pub rule: String,
    /// The frames behind the decision, newest last.
    pub evidence: Vec<EvidenceFrame>,
    /// For an action forced by an administrator: who.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// For a liveness challenge's entry (issued, passed, failed): which, and how it went.
    /// An entry that only records a challenge (`origin` `challenge`) repeats the action in
    /// force as its `action`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<ChallengeNote>,
}

/// A liveness challenge, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChallengeNote {
    pub id: Uuid,
    /// `start`, `suspicion`, `operator`, `random` or `retry`; for a suspicion, the signal
    /// follows (`suspicion:still`).
    pub trigger: String,
    pub steps: Vec<crate::domain::StepKind>,
    /// `issued`, `passed` or `failed`.
    pub outcome: String,
    /// How far it got.
    pub detail: String,
}

/// One frame kept as evidence: the JPEG as received, and what the worker said about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceFrame {
    pub seq: u64,
    pub frame_id: Uuid,
    pub received_at_ms: u64,
    #[serde(deserialize_with = "shared_bytes::deserialize")]
    pub jpeg: bytes::Bytes,
    pub analysis: Analysis,
}

impl Payload {
    /// The AMQP `type` property for this payload.
    /// The frame a worker's answer is for: (session, seq, frame id). `None` for any other
    /// payload.
    pub fn answers(&self) -> Option<(u64, u64, Uuid)> {
        match self {
            Payload::Result(r) => Some((r.session, r.seq, r.frame_id)),
            Payload::Dropped(d) => Some((d.session, d.seq, d.frame_id)),
            Payload::Frame(_)
            | Payload::Action(_)
            | Payload::Control(_)
            | Payload::AdminOp(_)
            | Payload::EnrollRequest(_)
            | Payload::EnrollResult(_)
            | Payload::Session(_) => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Payload::Frame(_) => "vigil.frame",
            Payload::Result(_) => "vigil.result",
            Payload::Dropped(_) => "vigil.dropped",
            Payload::Action(_) => "vigil.action",
            Payload::Control(_) => "vigil.control",
            Payload::AdminOp(_) => "vigil.admin_op",
            Payload::EnrollRequest(_) => "vigil.enroll_request",
            Payload::EnrollResult(_) => "vigil.enroll_result",
            Payload::Session(_) => "vigil.session",
        }
    }
}

/// One camera frame from a client session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// Edge-local session number; results for an older session of the same client are ignored.
    pub session: u64,
    /// The client's own frame sequence number.
    pub seq: u64,
    /// When the client captured the frame (client clock, Unix ms), if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_at_ms: Option<u64>,
    /// The JPEG, shared rather than copied between the edge's socket and the encoder, and
    /// between a worker's delivery and its analyzer.
    #[serde(deserialize_with = "shared_bytes::deserialize")]
    pub jpeg: bytes::Bytes,
    /// The client's enrolled reference embedding (little-endian `f32`s), so that any worker can
    /// verify any client without shared state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<serde_bytes::ByteBuf>,
    /// Whether to run the phone detector on this frame ([`crate::cadence`]); a worker runs it
    /// anyway when the verdict is not `ok`. Absent (true) from edges that predate it.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub phone_check: bool,
    /// The client's face track, as its newest answered frame left it, when the edge lets this
    /// frame carry the identity over ([`crate::cadence::IdentityCadence`]): if the frame's one
    /// face is still on it, the worker runs neither the recogniser nor the liveness models on
    /// it and says so (`skipped`). Absent: every model runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<Track>,
}

/// Where a face is: its box and its five landmarks (right eye, left eye, nose, right and left
/// mouth corners), in the frame's pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Track {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
    pub landmarks: [[f32; 2]; 5],
}

impl Track {
    /// Every value a finite number and the box not empty (a track comes from the broker: it is
    /// checked, not trusted).
    pub fn is_valid(&self) -> bool {
        let all = [self.x, self.y, self.w, self.h]
            .into_iter()
            .chain(self.landmarks.iter().flatten().copied());
        all.into_iter().all(f32::is_finite) && self.w > 0.0 && self.h > 0.0
    }
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

/// A worker's analysis of one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameResult {
    pub session: u64,
    pub seq: u64,
    /// Event id of the frame this answers.
    pub frame_id: Uuid,
    /// Name of the analyzer that produced it.
    pub analyzer: String,
    /// Time spent analysing, in microseconds.
    pub analyze_us: u64,
    pub analysis: Analysis,
}

/// What an analyzer found in a frame.
// Identity results are built once per frame and moved along, never stored in bulk; boxing
// them would cost an allocation per frame to save stack bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Analysis {
    /// Transport-level facts read from the JPEG markers, without decoding pixels.
    FrameInfo {
        width: u16,
        height: u16,
        components: u8,
    },
    /// The model stack's answer: who is there, alive or not, and whether a phone is in view.
    Identity(IdentityAnalysis),
}

impl Analysis {
    /// The verdict, for analyzers that give one.
    pub fn verdict(&self) -> Option<Verdict> {
        match self {
            Analysis::Identity(a) => Some(a.verdict),
            Analysis::FrameInfo { .. } => None,
        }
    }
}

/// Scores behind a verdict, in the frame's pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityAnalysis {
    pub verdict: Verdict,
    pub faces: Vec<FaceBox>,
    /// Similarity of the largest face to the enrolled reference; absent without a face or
    /// without a reference.
    pub identity: Option<IdentityScore>,
    /// Liveness of the largest face.
    pub liveness: Option<LivenessScore>,
    /// The best phone detection, if any passed the threshold.
    pub phone: Option<PhoneBox>,
    /// `name:version` of each model of the stack, in the order they run.
    pub models: Vec<String>,
    /// Those of `models` that did not run on this frame (the phone detector off its cadence,
    /// on a frame whose verdict was `ok` without it). Never shown to a client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Those of `models` whose judgement this frame carried over from the client's face track
    /// instead of running them (the recogniser and the liveness models on a frame on the
    /// track, [`Frame::track`]). Never shown to a client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub carried: Vec<String>,
    /// The thresholds the verdict was decided with.
    #[serde(default)]
    pub thresholds: BTreeMap<String, f32>,
    /// How well the largest face can be judged (schema 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<FaceQuality>,
    /// The largest face's appearance for the stream liveness's still test (schema 2): its
    /// aligned grey levels pooled to [`APPEARANCE_SIDE`] squared cells, less their mean, as
    /// signed bytes ([`pack_appearance`]). It is a small picture of the face: the edge consumes
    /// it and strips it before a result reaches a client or the audit trail. (Workers before
    /// this field sent the recognition embedding as `signature`; it is ignored.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appearance: Option<serde_bytes::ByteBuf>,
    /// Where the largest face is, for the edge to hand to the client's next frames
    /// ([`Frame::track`]). Never shown to a client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<Track>,
}

impl IdentityAnalysis {
    /// Keep only what a candidate needs (the verdict, the face boxes to draw, the stack's
    /// models) and drop every score behind it: similarity, liveness and presentation-attack scores, pose,
    /// the phone detector's box and the thresholds. A client that sees the numbers can tune a
    /// photo or a mask against them frame by frame.
    pub fn strip_scores(&mut self) {
        // Nor which frames skipped a model: the phone detector's cadence would tell a client
        // when to show a phone.
        self.skipped.clear();
        self.carried.clear();
        self.identity = None;
        self.liveness = None;
        self.phone = None;
        self.thresholds.clear();
        self.quality = None;
        self.appearance = None;
        self.track = None;
    }
}

/// Measures of how well a face can be judged, and the first one that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceQuality {
    /// The face box's shorter side, in pixels.
    pub face_px: f32,
    /// Variance of the Laplacian of the aligned face (grey levels squared): higher is sharper.
    pub sharpness: f32,
    /// Mean grey level of the aligned face, 0..255.
    pub brightness: f32,
    /// Horizontal turn: the nose's offset from the eyes' midpoint, in eye distances.
    pub yaw: f32,
    /// Vertical turn: the nose's position between the eyes and the mouth, 0.5 when level.
    pub pitch: f32,
    /// Why the face is too poor to judge (`too_small`, `blurred`, `too_dark`, `too_bright`,
    /// `turned`); absent when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceBox {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityScore {
    pub similarity: f32,
    pub matched: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LivenessScore {
    /// The single-frame model's P(live).
    pub p_live: f32,
    /// The presentation-attack model's P(real) for the same face, when the worker runs one
    /// (schema 2; see `docs/liveness.md`). A passive signal: it can raise a suspicion, never
    /// an action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad: Option<f32>,
    /// False when the fused evidence says the face is not live.
    pub live: bool,
    /// The stream's evidence, added by the edge that sees the client's frames in order
    /// (schema 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporal: Option<TemporalScore>,
}

/// Liveness evidence over a client's recent frames (see `crate::liveness`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemporalScore {
    /// Faces in the window.
    pub faces: u32,
    /// Median signature distance between consecutive faces: the detector's jitter.
    pub jitter: f32,
    /// Median signature distance between faces at least the drift lag apart.
    pub drift: f32,
    /// Median single-frame P(live) over the window.
    pub p_live_median: f32,
    /// Median presentation-attack P(real) over the window, when the worker gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_median: Option<f32>,
    /// Which passive signal raised a suspicion: `still` (the face has not changed beyond
    /// jitter for a while: a photo or a replayed frame), `model` (the single-frame model is
    /// sure over the whole window), `pad` (the presentation-attack model is) or `disagree`
    /// (that model is sure of both, live and attack, within the window); absent when none did. A suspicion asks for a challenge; it never acts by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spoof: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneBox {
    pub score: f32,
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
}

/// Pack an embedding as little-endian `f32`s (its wire form).
pub fn pack_embedding(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Unpack an embedding; `None` when the byte count is not a multiple of 4.
pub fn unpack_embedding(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// Cells per side of a face's appearance: the aligned 112x112 face pooled in 4x4 blocks.
pub const APPEARANCE_SIDE: usize = 28;

/// Bytes in a face's appearance on the wire.
pub const APPEARANCE_BYTES: usize = APPEARANCE_SIDE * APPEARANCE_SIDE;

/// A face's appearance in its wire form: each value scaled so that the largest is ±127, as
/// signed bytes.
pub fn pack_appearance(values: &[f32]) -> Vec<u8> {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { 127.0 / max } else { 0.0 };
    values
        .iter()
        .map(|v| (v * scale).round().clamp(-127.0, 127.0) as i8 as u8)
        .collect()
}

/// An appearance from its wire form, L2-normalised; `None` unless it has exactly
/// [`APPEARANCE_BYTES`] bytes, not all zero (a result from the broker is checked, not
/// trusted).
pub fn unpack_appearance(bytes: &[u8]) -> Option<Vec<f32>> {
    if bytes.len() != APPEARANCE_BYTES {
        return None;
    }
    let v: Vec<f32> = bytes.iter().map(|b| *b as i8 as f32).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    (norm > 0.0).then(|| v.into_iter().map(|x| x / norm).collect())
}

/// A frame that was not analysed, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dropped {
    pub session: u64,
    pub seq: u64,
    pub frame_id: Uuid,
    pub reason: DropReason,
    /// Human-readable detail, for example the decoder's complaint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Why a frame got no analysis. Shared by the broker events and the client protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Its deadline passed before a worker got to it, or before its result came back.
    Expired,
    /// A newer frame from the same client replaced it while it waited (latest frame wins).
    Superseded,
    /// The client sent faster than its frames-per-second limit.
    RateLimited,
    /// Larger than the edge's frame size limit.
    FrameTooLarge,
    /// Not a JPEG (does not start with FF D8), or its markers are broken.
    NotJpeg,
    /// The client reused a sequence number that is still in flight.
    DuplicateSeq,
    /// The edge could not hand the frame to the broker.
    BrokerUnavailable,
    /// The edge is shutting down.
    ShuttingDown,
    /// The analyzer failed on this frame twice.
    AnalyzerFailed,
    /// An administrator paused this client.
    Paused,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::Expired,
        DropReason::Superseded,
        DropReason::RateLimited,
        DropReason::FrameTooLarge,
        DropReason::NotJpeg,
        DropReason::DuplicateSeq,
        DropReason::BrokerUnavailable,
        DropReason::ShuttingDown,
        DropReason::AnalyzerFailed,
        DropReason::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Expired => "expired",
            DropReason::Superseded => "superseded",
            DropReason::RateLimited => "rate_limited",
            DropReason::FrameTooLarge => "frame_too_large",
            DropReason::NotJpeg => "not_jpeg",
            DropReason::DuplicateSeq => "duplicate_seq",
            DropReason::BrokerUnavailable => "broker_unavailable",
            DropReason::ShuttingDown => "shutting_down",
            DropReason::AnalyzerFailed => "analyzer_failed",
            DropReason::Paused => "paused",
        }
    }
}

impl Envelope {
    /// Encode as a MessagePack map with field names, in one allocation of the right size.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let body = match &self.payload {
            Payload::Frame(f) => f.jpeg.len(),
            _ => 0,
        };
        let mut buf = Vec::with_capacity(body + 512);
        rmp_serde::encode::write_named(&mut buf, self)?;
        Ok(buf)
    }

    /// Decode an event, refusing schema versions this build does not read.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let env: Envelope = rmp_serde::from_slice(bytes)?;
        if !(SCHEMA_MIN..=SCHEMA).contains(&env.schema) {
            return Err(WireError::UnsupportedSchema { found: env.schema });
        }
        Ok(env)
    }

    /// [`Envelope::decode`] from shared bytes: a frame's JPEG (and evidence JPEGs) become
    /// views into `bytes` rather than copies of it.
    pub fn decode_shared(bytes: &bytes::Bytes) -> Result<Self, WireError> {
        shared_bytes::with_source(bytes, || Self::decode(bytes))
    }

    /// Milliseconds left until the deadline, as of `now_ms` (0 when already past).
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        self.deadline_ms.saturating_sub(now_ms)
    }
}

/// Deserializing `Bytes` fields without copying: while [`with_source`] runs, a byte string
/// that the decoder borrows from the source buffer becomes a view into it (same allocation,
/// one more reference). Anything else (no source, or bytes from elsewhere) is copied, which
/// is what `Bytes`' own `Deserialize` does.
mod shared_bytes {
    use std::cell::RefCell;

    use bytes::Bytes;
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};

    thread_local! {
        static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    }

    /// Run `f` with `source` as the buffer that borrowed byte strings are sliced from.
    pub(super) fn with_source<T>(source: &Bytes, f: impl FnOnce() -> T) -> T {
        struct Reset(Option<Bytes>);
        impl Drop for Reset {
            fn drop(&mut self) {
                SOURCE.with(|s| *s.borrow_mut() = self.0.take());
            }
        }
        let _reset = Reset(SOURCE.with(|s| s.borrow_mut().replace(source.clone())));
        f()
    }

    fn share(v: &[u8]) -> Bytes {
        SOURCE.with(|s| match &*s.borrow() {
            Some(src)
                if !v.is_empty()
                    && src.as_ptr_range().start <= v.as_ptr()
                    && v.as_ptr_range().end <= src.as_ptr_range().end =>
            {
                src.slice_ref(v)
            }
            _ => Bytes::copy_from_slice(v),
        })
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bytes;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_borrowed_bytes<E: Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
                Ok(share(v))
            }

            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::copy_from_slice(v))
            }

            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes::from(out))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Current wall-clock time in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new W3C `traceparent` with a random trace id and span id, sampled.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    format!("00-{trace:032x}-{span:016x}-01")
}

/// A child `traceparent`: same trace id, new span id. Falls back to a new trace when the parent
/// is not a valid W3C header.
pub fn child_traceparent(parent: &str) -> String {
    match trace_id(parent) {
        Some(trace) => format!("00-{trace}-{:016x}-01", rand::random::<u64>() | 1),
        None => new_traceparent(),
    }
}

/// The 32-hex-digit trace id of a `traceparent`, if it is well formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2) && parts.next().is_none())
        .then_some(trace)
}

/// Serde for a `traceparent`: a well-formed W3C header travels as 26 bytes (version, trace id,
/// span id, flags) instead of 55 characters; anything else travels as a string.
mod packed_traceparent {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &str, s: S) -> Result<S::Ok, S::Error> {
        match pack(value) {
            Some(bytes) => s.serialize_bytes(&bytes),
            None => s.serialize_str(value),
        }
    }

    fn pack(value: &str) -> Option<[u8; 26]> {
        super::trace_id(value)?;
        let digits: String = value.split('-').collect();
        let mut out = [0u8; 26];
        hex::decode_to_slice(digits, &mut out).ok()?;
        Some(out)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = String;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a traceparent as 26 bytes or a string")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<String, E> {
                if b.len() != 26 {
                    return Err(E::invalid_length(b.len(), &self));
                }
                Ok(format!(
                    "{}-{}-{}-{}",
                    hex::encode(&b[..1]),
                    hex::encode(&b[1..17]),
                    hex::encode(&b[17..25]),
                    hex::encode(&b[25..])
                ))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
                Ok(s.to_owned())
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_frame(jpeg_len: usize) -> Envelope {
        let mut jpeg = vec![0xAB; jpeg_len];
        if jpeg_len >= 2 {
            jpeg[..2].copy_from_slice(&[0xFF, 0xD8]);
        }
        Envelope {
            schema: SCHEMA,
            id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001),
            source: "edge-eu-west-1a".into(),
            seq: 1_234_567,
            client_id: "exam-candidate-000042".into(),
            produced_at_ms: 1_763_000_000_000,
            deadline_ms: 1_763_000_002_000,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            payload: Payload::Frame(Frame {
                session: u64::MAX - 7,
                seq: 987_654,
                captured_at_ms: Some(1_762_999_999_990),
                jpeg: jpeg.into(),
                reference: None,
                phone_check: true,
                track: None,
            }),
        }
    }

    #[test]
    fn a_frame_off_the_phone_cadence_says_so_and_one_from_an_older_edge_checks() {
        let on = sample_frame(100);
        let mut off = on.clone();
        if let Payload::Frame(f) = &mut off.payload {
            f.phone_check = false;
        }
        let decoded = Envelope::decode(&off.encode().unwrap()).unwrap();
        assert_eq!(decoded, off);
        // `true` is not written: a frame from an edge that predates the cadence decodes as
        // one that runs the detector, and its bytes are what they were.
        let (on_bytes, off_bytes) = (on.encode().unwrap(), off.encode().unwrap());
        assert!(on_bytes.len() < off_bytes.len());
        assert!(matches!(
            Envelope::decode(&on_bytes).unwrap().payload,
            Payload::Frame(Frame {
                phone_check: true,
                track: None,
                ..
            })
        ));
    }

    #[test]
    fn frame_overhead_is_at_most_256_bytes() {
        for len in [0usize, 100, 40_000, 70_000, 1 << 20] {
            let env = sample_frame(len);
            let bytes = env.encode().unwrap();
            assert!(
                bytes.len() <= len + 256,
                "encoded {} bytes for a {len}-byte jpeg (overhead {})",
                bytes.len(),
                bytes.len() - len
            );
        }
    }

    #[test]
    fn reference_embedding_adds_its_512_bytes_and_little_else() {
        let mut env = sample_frame(40_000);
        let plain = env.encode().unwrap().len();
        let embedding: Vec<f32> = (0..128).map(|i| i as f32 / 128.0).collect();
        if let Payload::Frame(f) = &mut env.payload {
            f.reference = Some(serde_bytes::ByteBuf::from(pack_embedding(&embedding)));
        }
        let bytes = env.encode().unwrap();
        assert!(
            bytes.len() <= plain + 512 + 16,
            "{} vs {plain}",
            bytes.len()
        );
        let Payload::Frame(f) = Envelope::decode(&bytes).unwrap().payload else {
            panic!("not a frame")
        };
        assert_eq!(unpack_embedding(&f.reference.unwrap()).unwrap(), embedding);
    }

    #[test]
    fn jpeg_travels_as_msgpack_bin() {
        let env = sample_frame(300);
        let bytes = env.encode().unwrap();
        // bin8 (0xc4) or bin16 (0xc5) header followed by the JPEG's SOI marker.
        let needle = [0xc5, 0x01, 0x2c, 0xFF, 0xD8];
        assert!(bytes.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn round_trip() {
        let env = sample_frame(1000);
        assert_eq!(Envelope::decode(&env.encode().unwrap()).unwrap(), env);
    }

    #[test]
    fn a_shared_decode_views_the_jpeg_in_place() {
        let env = sample_frame(40_000);
        let bytes = bytes::Bytes::from(env.encode().unwrap());
        let shared = Envelope::decode_shared(&bytes).unwrap();
        assert_eq!(shared, env);
        let Payload::Frame(f) = &shared.payload else {
            panic!("not a frame")
        };
        let (src, jpeg) = (bytes.as_ptr_range(), f.jpeg.as_ptr_range());
        assert!(
            src.start <= jpeg.start && jpeg.end <= src.end,
            "the JPEG was copied"
        );
        // Outside a shared decode, and after one, the JPEG is an independent copy.
        let Payload::Frame(copied) = Envelope::decode(&bytes).unwrap().payload else {
            panic!("not a frame")
        };
        assert!(!src.contains(&copied.jpeg.as_ptr()));
        assert_eq!(copied.jpeg, f.jpeg);
        // Garbage is still a typed error, and leaves no source behind.
        let bad = bytes.slice(..bytes.len() / 2);
        assert!(matches!(
            Envelope::decode_shared(&bad),
            Err(WireError::Decode(_))
        ));
        let Payload::Frame(after) = Envelope::decode(&bytes).unwrap().payload else {
            panic!("not a frame")
        };
        assert!(!src.contains(&after.jpeg.as_ptr()));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        for bytes in [
            &b""[..],
            b"\xff\xff",
            b"{\"json\":true}",
            &[0x81, 0xa1, 0x61],
        ] {
            assert!(matches!(Envelope::decode(bytes), Err(WireError::Decode(_))));
        }
        let mut env = sample_frame(10);
        env.schema = 99;
        let err = Envelope::decode(&env.encode().unwrap()).unwrap_err();
        assert!(
            matches!(err, WireError::UnsupportedSchema { found: 99 }),
            "{err}"
        );
    }

    #[test]
    fn truncated_events_never_panic() {
        let bytes = sample_frame(64).encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn traceparent_is_packed_and_restored() {
        let mut env = sample_frame(10);
        let bytes = env.encode().unwrap();
        assert!(
            !bytes
                .windows(32)
                .any(|w| w == b"4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            Envelope::decode(&bytes).unwrap().traceparent,
            env.traceparent
        );
        env.traceparent = "not-w3c".into();
        assert_eq!(Envelope::decode(&env.encode().unwrap()).unwrap(), env);
    }

    #[test]
    fn traceparent_helpers() {
        let parent = new_traceparent();
        let tid = trace_id(&parent).unwrap().to_owned();
        let child = child_traceparent(&parent);
        assert_eq!(trace_id(&child), Some(tid.as_str()));
        assert_ne!(child, parent);
        assert_eq!(trace_id("00-xyz"), None);
        assert!(trace_id(&child_traceparent("bogus")).is_some());
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Envelope::decode(&bytes);
        }
    }
}
