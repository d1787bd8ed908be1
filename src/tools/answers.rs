//! A simulated candidate's answers to liveness challenges, made from real footage: the frames
//! of the enrolled person facing the camera and turned each way, picked by the model stack's
//! own pose (never synthesised). `vigil stream --answer-from` and the tests use it.

use std::collections::BTreeMap;

use crate::challenge::{ChallengeConfig, StepKind};
use crate::inference::{IdentityStack, InferenceError};

/// Facing and turned frames of one person.
#[derive(Debug, Clone, Default)]
pub struct Answers {
    pub facing: Vec<Vec<u8>>,
    /// Per kind, the turned frames in the order they were filmed.
    pub turned: BTreeMap<StepKind, Vec<Vec<u8>>>,
}

impl Answers {
    /// Pick from `frames` (in filmed order) of the person enrolled as `reference`: facing
    /// frames are the enrolled person within ±0.03 of straight; turned frames are past the
    /// challenge's turn level (with a margin of 0.02) and still similar enough.
    pub fn pick(
        stack: &IdentityStack,
        reference: &[f32],
        frames: &[Vec<u8>],
        cfg: &ChallengeConfig,
    ) -> Result<Self, InferenceError> {
        let mut out = Answers::default();
        for f in frames {
            let (a, _) = stack.analyze(f, Some(reference))?;
            let (Some(q), Some(i), 1) = (&a.quality, &a.identity, a.faces.len()) else {
                continue;
            };
            let level = cfg.turn_yaw + 0.02;
            if q.yaw.abs() <= 0.03 && i.matched {
                out.facing.push(f.clone());
            } else if i.similarity >= cfg.turn_match_cosine && q.yaw.abs() >= level {
                let kind = if q.yaw > 0.0 {
                    StepKind::TurnLeft
                } else {
                    StepKind::TurnRight
                };
                out.turned.entry(kind).or_default().push(f.clone());
            }
        }
        Ok(out)
    }

    /// The kinds these frames can answer.
    pub fn kinds(&self) -> Vec<StepKind> {
        if self.facing.len() < 2 {
            return Vec::new();
        }
        self.turned.keys().copied().collect()
    }

    /// The frames for one step: facing, the turn in filmed order, facing again; `None` when
    /// the footage has no such turn.
    pub fn step(&self, kind: StepKind) -> Option<Vec<Vec<u8>>> {
        let turned = self.turned.get(&kind)?;
        if self.facing.len() < 2 {
            return None;
        }
        let mut out: Vec<Vec<u8>> = self.facing[..2].to_vec();
        out.extend(turned.iter().cloned());
        out.extend(self.facing[..2].iter().cloned());
        Some(out)
    }
}
