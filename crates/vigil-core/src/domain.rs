//! The words every part of Vigil shares: what a frame was judged (`Verdict`), what the client
//! must do (`Action`), and where models run (`Device`). Kept apart so that the wire format,
//! the policy, the configuration and the inference code depend on this module and not on each
//! other.

use serde::{Deserialize, Serialize};

/// The per-frame verdict: the first rule that applies, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    NoFace,
    MultipleFaces,
    /// The face is too small, blurred, dark or turned to be judged (schema 2).
    LowQuality,
    Spoof,
    WrongPerson,
    Phone,
    Ok,
    /// Not a frame's verdict but the stream's: no frame arrived for `policy.no_frames_ms`
    /// (the camera was turned off, or the page stopped sending). The edge feeds it to the
    /// policy; workers never give it.
    NoFrames,
    /// Not a frame's verdict but the edge's: the client sent something that is not a usable
    /// JPEG (refused by the edge's header check, or by the worker's decoder). It is not
    /// presence, and the policy counts it.
    InvalidFrame,
}

impl Verdict {
    /// Every verdict a frame can get (not `no_frames`, which only the edge gives).
    pub const ALL: [Verdict; 7] = [
        Verdict::NoFace,
        Verdict::MultipleFaces,
        Verdict::LowQuality,
        Verdict::Spoof,
        Verdict::WrongPerson,
        Verdict::Phone,
        Verdict::Ok,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::NoFace => "no_face",
            Verdict::MultipleFaces => "multiple_faces",
            Verdict::LowQuality => "low_quality",
            Verdict::Spoof => "spoof",
            Verdict::WrongPerson => "wrong_person",
            Verdict::Phone => "phone",
            Verdict::Ok => "ok",
            Verdict::NoFrames => "no_frames",
            Verdict::InvalidFrame => "invalid_frame",
        }
    }
}

/// What the client must do.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Warn,
    LockScreen,
    SignOut,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Warn => "warn",
            Action::LockScreen => "lock_screen",
            Action::SignOut => "sign_out",
        }
    }
}

/// Execution provider choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device `{other}` (cpu or cuda)")),
        }
    }
}

/// One step of a liveness challenge: what the candidate is asked to do. Directions are the
/// candidate's own (`turn_left`: the candidate turns their head to their left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    TurnLeft,
    TurnRight,
}

impl StepKind {
    pub const ALL: [StepKind; 2] = [StepKind::TurnLeft, StepKind::TurnRight];

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::TurnLeft => "turn_left",
            StepKind::TurnRight => "turn_right",
        }
    }
}
