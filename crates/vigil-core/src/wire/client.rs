//! The client protocol spoken over the WebSocket (see `docs/protocol.md`).
//!
//! Text messages are JSON; binary messages are MessagePack maps with the same fields, or a raw
//! JPEG (first bytes `FF D8`). Parsing is total: every input gives a message or a
//! [`ProtocolError`] that names what was wrong.

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Analysis, DropReason};

/// How a client frames its messages; replies use the same encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    MsgPack,
}

impl Encoding {
    /// The WebSocket subprotocol that names this encoding.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => "vigil.v1.json",
            Encoding::MsgPack => "vigil.v1.msgpack",
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name {
            "vigil.v1.json" => Some(Encoding::Json),
            "vigil.v1.msgpack" => Some(Encoding::MsgPack),
            _ => None,
        }
    }
}

/// A message from a client, after parsing.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    Hello {
        client_id: String,
        token: String,
    },
    Frame(ClientFrame),
    /// An application ping (browsers cannot send WebSocket pings); answered with a pong
    /// carrying the same `id`.
    Ping {
        id: Option<u64>,
    },
    /// What the client says stops it capturing (or that it captures again): its own word on
    /// the candidate's presence.
    Presence {
        state: CaptureState,
    },
}

/// A client's account of its capture: `{"type":"presence","state":...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureState {
    /// Frames flow again.
    Ok,
    /// The camera's track ended (unplugged, taken by another application, permission revoked).
    CameraLost,
    /// The browser could not encode the camera's picture.
    EncoderFailed,
    /// The page is in a background tab.
    Hidden,
}

impl CaptureState {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureState::Ok => "ok",
            CaptureState::CameraLost => "camera_lost",
            CaptureState::EncoderFailed => "encoder_failed",
            CaptureState::Hidden => "hidden",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            CaptureState::Ok,
            CaptureState::CameraLost,
            CaptureState::EncoderFailed,
            CaptureState::Hidden,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// A frame as the client sent it. `seq` is `None` for a raw binary JPEG (the edge assigns one).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub seq: Option<u64>,
    pub captured_at_ms: Option<u64>,
    pub jpeg: Bytes,
}

/// Why a client message could not be understood.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid json: {0}")]
    Json(String),
    #[error("invalid msgpack: {0}")]
    MsgPack(String),
    #[error("frame has no image: send `jpeg` (msgpack bin) or `jpeg_b64` (json)")]
    MissingImage,
    #[error("`jpeg_b64` is not valid base64: {0}")]
    Base64(String),
    #[error("missing field: {0}")]
    Missing(&'static str),
    #[error("unknown message type `{0}` (expected hello, frame, ping or presence)")]
    UnknownType(String),
}

/// The wire shape of a client message: one flat map whose `type` selects what it is. A flat
/// struct (rather than a tagged enum) lets serde borrow the JPEG bytes from the input instead
/// of buffering the whole message first.
#[derive(Deserialize)]
struct RawClientMsg<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    captured_at_ms: Option<u64>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    state: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    jpeg: Option<&'a serde_bytes::Bytes>,
    #[serde(default, borrow)]
    jpeg_b64: Option<std::borrow::Cow<'a, str>>,
    /// Legacy field name from the old prototype; may carry a `data:` URL prefix.
    #[serde(default, borrow)]
    jpeg_blob: Option<std::borrow::Cow<'a, str>>,
}

/// True when `bytes` start with the JPEG start-of-image marker.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8])
}

/// Parse a text (JSON) message.
pub fn parse_text(text: &str) -> Result<ClientMsg, ProtocolError> {
    let raw: RawClientMsg =
        serde_json::from_str(text).map_err(|e| ProtocolError::Json(e.to_string()))?;
    raw.into_msg(Bytes::copy_from_slice)
}

/// Parse a binary message: a raw JPEG or a MessagePack map. The frame's JPEG is a zero-copy
/// slice of `bytes`.
pub fn parse_binary(bytes: &Bytes) -> Result<ClientMsg, ProtocolError> {
    if is_jpeg(bytes) {
        return Ok(ClientMsg::Frame(ClientFrame {
            seq: None,
            captured_at_ms: None,
            jpeg: bytes.clone(),
        }));
    }
    let raw: RawClientMsg =
        rmp_serde::from_slice(bytes).map_err(|e| ProtocolError::MsgPack(e.to_string()))?;
    raw.into_msg(|jpeg| bytes.slice_ref(jpeg))
}

impl RawClientMsg<'_> {
    fn into_msg(self, own: impl FnOnce(&[u8]) -> Bytes) -> Result<ClientMsg, ProtocolError> {
        match &*self.kind {
            "hello" => match (self.client_id, self.token) {
                (Some(client_id), Some(token)) => Ok(ClientMsg::Hello { client_id, token }),
                _ => Err(ProtocolError::Missing(
                    "hello needs `client_id` and `token`",
                )),
            },
            "frame" => {
                let jpeg = match (self.jpeg, self.jpeg_b64.or(self.jpeg_blob)) {
                    (Some(bytes), _) => own(bytes),
                    (None, Some(text)) => Bytes::from(decode_b64(&text)?),
                    (None, None) => return Err(ProtocolError::MissingImage),
                };
                Ok(ClientMsg::Frame(ClientFrame {
                    seq: self.seq,
                    captured_at_ms: self.captured_at_ms,
                    jpeg,
                }))
            }
            "ping" => Ok(ClientMsg::Ping { id: self.id }),
            "presence" => self
                .state
                .as_deref()
                .and_then(CaptureState::parse)
                .map(|state| ClientMsg::Presence { state })
                .ok_or(ProtocolError::Missing(
                    "presence needs `state`: ok, camera_lost, encoder_failed or hidden",
                )),
            other => Err(ProtocolError::UnknownType(other.chars().take(32).collect())),
        }
    }
}

fn decode_b64(text: &str) -> Result<Vec<u8>, ProtocolError> {
    // Accept a `data:image/jpeg;base64,` URL, as the old browser client sent.
    let body = match text.split_once(";base64,") {
        Some((prefix, body)) if prefix.starts_with("data:") => body,
        _ => text,
    };
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| ProtocolError::Base64(e.to_string()))
}

/// Error codes sent in `{"type":"error"}` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Blocked,
    DuplicateSession,
    TooFast,
    SystemFull,
    HelloTimeout,
    Kicked,
    /// The policy signed the client out; it may not start a session until an operator
    /// re-admits it (`vigil clients readmit`). Final: a client must not reconnect.
    SignedOut,
    /// The client stopped reading: a write to it did not finish within the edge's deadline.
    SlowReader,
    /// Nothing, not even a pong, arrived from the client within the idle timeout.
    Idle,
    Internal,
}

impl ErrorCode {
    /// The WebSocket close code that goes with this error, when it ends the session.
    pub fn close_code(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::HelloTimeout => 4400,
            ErrorCode::Unauthorized => 4401,
            ErrorCode::Blocked => 4403,
            ErrorCode::DuplicateSession => 4409,
            ErrorCode::TooFast => 4429,
            ErrorCode::SystemFull => 4503,
            ErrorCode::Kicked => 4000,
            ErrorCode::SignedOut => 4423,
            ErrorCode::SlowReader => 4408,
            ErrorCode::Idle => 4410,
            ErrorCode::Internal => 1011,
        }
    }
}

/// A message from the edge to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Identity results are built once per frame and moved along, never stored in bulk; boxing
// them would cost an allocation per frame to save stack bytes.
#[allow(clippy::large_enum_variant)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Welcome {
        session_id: String,
        max_frame_bytes: usize,
        max_fps: u32,
        max_inflight: usize,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Result {
        seq: u64,
        /// From the frame's arrival at the edge to its result leaving the edge, in ms.
        latency_ms: f64,
        frame_id: String,
        /// The W3C trace id the frame carried through edge and worker, for support requests.
        #[serde(default)]
        trace_id: String,
        analyzer: String,
        analysis: Analysis,
    },
    Dropped {
        seq: u64,
        reason: DropReason,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
    },
    /// The session's state changed: `paused` (frames are not analysed) or `active`.
    Status {
        state: String,
    },
    /// The system is under load: send at most `max_fps` frames per second.
    Throttle {
        max_fps: u32,
    },
    /// An enforced action: the client must allow, warn, lock the screen or sign out.
    Action {
        action: crate::domain::Action,
        /// The verdict that fired it, `ok` for a return to allow, or `admin`.
        reason: String,
        action_id: String,
        evidence_id: String,
    },
    /// Prove liveness: do each step in order, each ending back facing the camera, within
    /// `deadline_ms` from now. Until it is passed the session is under suspicion; a failure
    /// or a timeout takes the `spoof` rule's next step (see `docs/protocol.md#challenges`).
    Challenge {
        id: String,
        steps: Vec<ChallengeStep>,
        /// Time left to finish every step, in ms from when this message is sent.
        deadline_ms: u64,
        /// Why it was issued: `start`, `suspicion`, `operator`, `random` or `retry`.
        reason: String,
    },
    /// The candidate finished `done` of the challenge's steps (the next one is `steps[done]`).
    ChallengeProgress {
        id: String,
        done: usize,
    },
    /// The challenge ended: passed, or failed with why (`timeout`).
    ChallengeResult {
        id: String,
        passed: bool,
        reason: String,
    },
    /// The answer to a client's `ping`.
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

impl ServerMsg {
    /// Encode for a client that speaks `encoding`.
    pub fn encode(&self, encoding: Encoding) -> Vec<u8> {
        match encoding {
            // Both encoders only fail on maps with non-string keys, which these types lack.
            Encoding::Json => serde_json::to_vec(self).expect("server message encodes as json"),
            Encoding::MsgPack => {
                rmp_serde::to_vec_named(self).expect("server message encodes as msgpack")
            }
        }
    }

    /// Decode a server message (used by Vigil's own clients: demo, bench, load generator).
    pub fn decode(bytes: &[u8], encoding: Encoding) -> Result<Self, ProtocolError> {
        match encoding {
            Encoding::Json => {
                serde_json::from_slice(bytes).map_err(|e| ProtocolError::Json(e.to_string()))
            }
            Encoding::MsgPack => {
                rmp_serde::from_slice(bytes).map_err(|e| ProtocolError::MsgPack(e.to_string()))
            }
        }
    }
}

/// One step of a challenge on the wire: `{"kind":"turn_left"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeStep {
    pub kind: crate::domain::StepKind,
}

/// Encode a hello for a client that speaks `encoding`.
pub fn encode_hello(client_id: &str, token: &str, encoding: Encoding) -> Vec<u8> {
    let msg = serde_json::json!({"type": "hello", "client_id": client_id, "token": token});
    match encoding {
        Encoding::Json => msg.to_string().into_bytes(),
        Encoding::MsgPack => rmp_serde::to_vec_named(&msg).expect("hello encodes"),
    }
}

/// Encode a frame for a client that speaks `encoding` (JSON uses base64).
pub fn encode_frame(seq: u64, captured_at_ms: u64, jpeg: &[u8], encoding: Encoding) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        seq: u64,
        captured_at_ms: u64,
        #[serde(with = "serde_bytes")]
        jpeg: &'a [u8],
    }
    match encoding {
        Encoding::Json => serde_json::json!({
            "type": "frame",
            "seq": seq,
            "captured_at_ms": captured_at_ms,
            "jpeg_b64": base64::engine::general_purpose::STANDARD.encode(jpeg),
        })
        .to_string()
        .into_bytes(),
        Encoding::MsgPack => {
            let mut buf = Vec::with_capacity(jpeg.len() + 64);
            rmp_serde::encode::write_named(
                &mut buf,
                &Out {
                    kind: "frame",
                    seq,
                    captured_at_ms,
                    jpeg,
                },
            )
            .expect("frame encodes");
            buf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JPEG: &[u8] = &[0xFF, 0xD8, 0xFF, 0xD9];

    #[test]
    fn hello_in_both_encodings() {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = encode_hello("c1", "t", enc);
            let msg = match enc {
                Encoding::Json => parse_text(std::str::from_utf8(&bytes).unwrap()),
                Encoding::MsgPack => parse_binary(&Bytes::from(bytes)),
            };
            assert_eq!(
                msg.unwrap(),
                ClientMsg::Hello {
                    client_id: "c1".into(),
                    token: "t".into()
                }
            );
        }
    }

    /// The string literals of the TypeScript union `export type {name} = ...;` in `src`.
    fn ts_union(src: &str, name: &str) -> std::collections::BTreeSet<String> {
        let start = src
            .find(&format!("export type {name} ="))
            .unwrap_or_else(|| panic!("no `export type {name}` in the SDK"));
        let body = &src[start..];
        let body = &body[..body.find(';').expect("a union ends with ;")];
        body.split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// The SDK's wire types (web/src/sdk.ts, shipped as `@vigil/sdk`) name exactly what the
    /// edge sends and takes.
    #[test]
    fn the_sdks_types_match_the_protocol() {
        use crate::domain::{Action, StepKind, Verdict};
        let sdk = include_str!("../../../../web/src/sdk.ts");
        let set = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect();
        let verdicts: Vec<&str> = Verdict::ALL
            .iter()
            .chain(&[Verdict::NoFrames, Verdict::InvalidFrame])
            .map(|v| v.as_str())
            .collect();
        assert_eq!(ts_union(sdk, "Verdict"), set(&verdicts));
        let actions = [
            Action::Allow,
            Action::Warn,
            Action::LockScreen,
            Action::SignOut,
        ];
        assert_eq!(
            ts_union(sdk, "ActionName"),
            set(&actions.map(|a| a.as_str()))
        );
        let steps: Vec<&str> = StepKind::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(ts_union(sdk, "ChallengeStepKind"), set(&steps));
        let triggers: Vec<&str> = [
            crate::challenge::Trigger::Start,
            crate::challenge::Trigger::Suspicion,
            crate::challenge::Trigger::Operator,
            crate::challenge::Trigger::Random,
            crate::challenge::Trigger::Retry,
        ]
        .iter()
        .map(|t| t.as_str())
        .collect();
        assert_eq!(ts_union(sdk, "ChallengeReason"), set(&triggers));
        let problems = [
            CaptureState::CameraLost,
            CaptureState::EncoderFailed,
            CaptureState::Hidden,
        ];
        assert_eq!(
            ts_union(sdk, "CaptureProblem"),
            set(&problems.map(|c| c.as_str()))
        );
        // Every problem the SDK reports parses at the edge.
        for p in ts_union(sdk, "CaptureProblem") {
            let msg = format!(r#"{{"type":"presence","state":"{p}"}}"#);
            assert!(parse_text(&msg).is_ok(), "{msg}");
        }
    }

    #[test]
    fn presence_says_what_stops_capturing() {
        assert_eq!(
            parse_text(r#"{"type":"presence","state":"hidden"}"#).unwrap(),
            ClientMsg::Presence {
                state: CaptureState::Hidden
            }
        );
        let packed =
            rmp_serde::to_vec_named(&serde_json::json!({"type":"presence","state":"camera_lost"}))
                .unwrap();
        assert_eq!(
            parse_binary(&Bytes::from(packed)).unwrap(),
            ClientMsg::Presence {
                state: CaptureState::CameraLost
            }
        );
        assert!(parse_text(r#"{"type":"presence","state":"asleep"}"#).is_err());
        assert!(parse_text(r#"{"type":"presence"}"#).is_err());
    }

    #[test]
    fn frame_forms() {
        let want = ClientFrame {
            seq: Some(7),
            captured_at_ms: Some(5),
            jpeg: Bytes::from_static(JPEG),
        };
        let mp = Bytes::from(encode_frame(7, 5, JPEG, Encoding::MsgPack));
        assert_eq!(parse_binary(&mp).unwrap(), ClientMsg::Frame(want.clone()));
        let js = encode_frame(7, 5, JPEG, Encoding::Json);
        assert_eq!(
            parse_text(std::str::from_utf8(&js).unwrap()).unwrap(),
            ClientMsg::Frame(want)
        );
        let legacy = r#"{"type":"frame","seq":3,"jpeg_blob":"data:image/jpeg;base64,/9j/2Q=="}"#;
        let ClientMsg::Frame(f) = parse_text(legacy).unwrap() else {
            panic!("not a frame")
        };
        assert_eq!((f.seq, &f.jpeg[..]), (Some(3), JPEG));
        let ClientMsg::Frame(raw) = parse_binary(&Bytes::from_static(JPEG)).unwrap() else {
            panic!("not a frame")
        };
        assert_eq!((raw.seq, &raw.jpeg[..]), (None, JPEG));
    }

    #[test]
    fn bad_input_names_the_problem() {
        assert!(matches!(parse_text("{nope"), Err(ProtocolError::Json(_))));
        assert!(matches!(
            parse_text(r#"{"type":"frame","seq":1}"#),
            Err(ProtocolError::MissingImage)
        ));
        assert!(matches!(
            parse_text(r#"{"type":"frame","seq":1,"jpeg_b64":"***"}"#),
            Err(ProtocolError::Base64(_))
        ));
        assert!(matches!(
            parse_text(r#"{"type":"launch","seq":1}"#),
            Err(ProtocolError::UnknownType(t)) if t == "launch"
        ));
        assert!(matches!(
            parse_text(r#"{"type":"hello","client_id":"x"}"#),
            Err(ProtocolError::Missing(_))
        ));
        assert!(matches!(
            parse_binary(&Bytes::from_static(b"\x00\x01")),
            Err(ProtocolError::MsgPack(_))
        ));
    }

    #[test]
    fn server_messages_round_trip() {
        let msgs = [
            ServerMsg::Dropped {
                seq: 4,
                reason: DropReason::Superseded,
                detail: String::new(),
            },
            ServerMsg::Result {
                seq: 9,
                latency_ms: 1.5,
                frame_id: "x".into(),
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                analyzer: "frame-info".into(),
                analysis: Analysis::FrameInfo {
                    width: 640,
                    height: 480,
                    components: 3,
                },
            },
        ];
        for msg in msgs {
            for enc in [Encoding::Json, Encoding::MsgPack] {
                assert_eq!(ServerMsg::decode(&msg.encode(enc), enc).unwrap(), msg);
            }
        }
        let text = String::from_utf8(
            ServerMsg::Error {
                code: ErrorCode::Unauthorized,
                message: "m".into(),
            }
            .encode(Encoding::Json),
        )
        .unwrap();
        assert_eq!(
            text,
            r#"{"type":"error","code":"unauthorized","message":"m"}"#
        );
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_text(&String::from_utf8_lossy(&bytes));
            let _ = parse_binary(&Bytes::from(bytes));
        }
    }
}
